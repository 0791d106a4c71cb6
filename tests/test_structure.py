"""Structure keys on the real architectures: equal exactly when one compiled graph can run both UNets."""
import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import structure_key


def test_same_architecture_other_weights_same_key():
    assert structure_key(arch.sd_unet(arch.SD15_TINY, seed=1)) == structure_key(arch.sd_unet(arch.SD15_TINY, seed=2))


def test_architectures_are_told_apart():
    keys = {
        "sd15": structure_key(arch.sd_unet(arch.SD15_TINY)),
        "sd15-inpainting": structure_key(arch.sd_unet(arch.SD15_TINY, in_channels=9)),
        "sd2": structure_key(arch.sd_unet(arch.SD2_TINY)),
        "sd15-more-heads": structure_key(arch.sd_unet(arch.SD15_TINY, num_heads=4)),
        "sdxl": structure_key(arch.sdxl_unet(arch.SDXL_TINY)),
        "sd15-fp16": structure_key(arch.sd_unet(arch.SD15_TINY).half()),
        "sd15-meta": structure_key(arch.sd_unet(arch.SD15_TINY).to("meta")),
    }
    assert len(set(keys.values())) == len(keys), keys


def test_layout_is_not_part_of_the_key():
    unet = arch.sd_unet(arch.SD15_TINY)
    before = structure_key(unet)
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    assert structure_key(unet) == before


def test_attributes_other_extensions_leave_do_not_change_the_key():
    """ControlNet leaves these on the UNet, reference-only on the blocks, webui's Lora on the layers; a hyperparameter
    the constructor set still counts."""
    unet = arch.sd_unet(arch.SD15_TINY)
    before = structure_key(unet)
    unet.current_sampling_percent, unet.current_h_shape, unet.is_in_high_res_fix = 0.4, (2, 4, 8, 8), False
    for block in unet.output_blocks:
        block.attn_weight, block.gn_weight, block.bank = 1.0, 0.5, []
    unet.input_blocks[0][0].network_current_names = ()
    assert structure_key(unet) == before
    unet.middle_block[1].transformer_blocks[0].attn1.heads = 4
    assert structure_key(unet) != before
