from sd_webui_onediff.torch_support import MIN_TORCH, torch_version_problem


def test_supported_versions_pass():
    assert torch_version_problem(f"{MIN_TORCH[0]}.{MIN_TORCH[1]}.0") is None
    assert torch_version_problem("2.11.0+cu130") is None
    assert torch_version_problem("3.0.0") is None


def test_old_torch_gets_a_message_saying_what_to_do():
    message = torch_version_problem("2.1.2+cu121")
    assert "torch >= 2.7" in message and "2.1.2" in message and "README" in message
    assert torch_version_problem("garbage") is not None


def test_install_adds_triton_only_where_it_is_missing():
    from sd_webui_onediff.torch_support import missing_requirements

    assert missing_requirements("2.11.0+cu130", "linux", cuda=True, triton_installed=True) == ([], None)
    assert missing_requirements("2.8.0+cu128", "win32", cuda=True, triton_installed=False) == (["triton-windows>=3.4,<3.5"], None)
    assert missing_requirements("2.8.0+cu128", "win32", cuda=True, triton_installed=True) == ([], None)
    assert missing_requirements("2.8.0+cpu", "win32", cuda=False, triton_installed=False) == ([], None)
    requirements, message = missing_requirements("2.11.0+cu130", "win32", cuda=True, triton_installed=False)
    assert requirements == [] and "triton-windows" in message
    requirements, message = missing_requirements("2.1.2+cu121", "linux", cuda=True, triton_installed=True)
    assert requirements == [] and "torch >= 2.7" in message
