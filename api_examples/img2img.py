"""img2img with the compiled UNet through webui's API; images go to ./api_out/img2img/.

    python api_examples/img2img.py --init-image api_examples/init.png --denoising-strength 0.6
"""
import base64
from pathlib import Path

import common

if __name__ == "__main__":
    parser = common.parser(__doc__)
    parser.add_argument("--init-image", type=Path, default=Path(__file__).with_name("init.png"))
    parser.add_argument("--denoising-strength", type=float, default=0.6)
    args = parser.parse_args()
    body = common.payload(args)
    body["init_images"] = [base64.b64encode(args.init_image.read_bytes()).decode()]
    body["denoising_strength"] = args.denoising_strength
    result = common.post(args.url, "/sdapi/v1/img2img", body)
    common.save_images(result, Path("api_out") / "img2img")
