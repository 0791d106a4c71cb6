"""sd-webui-controlnet's units on the compiled UNet (``glue.py``); imports nothing from webui or ControlNet."""
