"""The extension's root package.

Webui imports every extension's modules into one global ``sys.modules``, and its builtin Lora extension owns the
top-level names ``lora``, ``network`` and ``networks``. Our packages (``compile``, ``lora``, ...) are therefore never
imported by their bare names: ``scripts/onediff.py`` and the tests load this folder as the package ``sd_webui_onediff``
(see ``load_extension_package`` there) and everything inside uses relative imports.
"""
