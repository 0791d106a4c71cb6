"""Generate with the compiled UNet through webui's API; images go to ./api_out/txt2img/.

    python api_examples/txt2img.py --prompt "a cat" --width 1024 --height 1024
"""
from pathlib import Path

import common

if __name__ == "__main__":
    args = common.parser(__doc__).parse_args()
    result = common.post(args.url, "/sdapi/v1/txt2img", common.payload(args))
    common.save_images(result, Path("api_out") / "txt2img")
