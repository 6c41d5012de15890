"""Read-out sweep (issue 13, row 26; scratch script kept as run): t and input resolution, one noise draw."""
import json, sys, shutil
from pathlib import Path
import numpy as np, torch
import torch.nn.functional as F
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
import seg as S
from factorized_seg.checkpoints import load_for_inference
from factorized_seg.data import load_images, read_rgb
from factorized_seg.inference import segment_tensor
from factorized_seg.viz import atomic_save_image
from diffusion_utils.schedule import to_model_range

torch.set_num_threads(1)
run, tag = Path(sys.argv[1]), sys.argv[2]
variants = [tuple(int(v) for v in x.split(":")) for x in sys.argv[3].split(",")]  # t:res
image_dir, mask_dir = S.dataset_dirs("flowers17")
files = S.masked_files(image_dir, mask_dir)
model, schedule, meta = load_for_inference(run)
sizes = [read_rgb(f).size for f in files]
out = {}
for t, res in variants:
    x0 = to_model_range(load_images(files, res, progress=False).float().div(255))
    with torch.no_grad():
        m = torch.cat([segment_tensor(model, schedule, x0[i:i+128], t, seeds=range(i, i + len(x0[i:i+128])))
                       for i in range(0, len(x0), 128)])
    pred = Path(f"/work/scratch/s6/pred2_{tag}_t{t}_r{res}/pred")
    shutil.rmtree(pred, ignore_errors=True); pred.mkdir(parents=True)
    for j, f in enumerate(files):
        w, h = sizes[j]
        full = F.interpolate(m[j:j+1], size=(h, w), mode="bilinear", align_corners=False)
        atomic_save_image(full[0].argmax(0).numpy().astype(np.uint8), pred / f"{f.stem}.png")
    r = S.score(pred, mask_dir)
    r["pos_only"] = S.position_only_share(pred, files)
    out[f"t{t}_r{res}"] = r
    print(tag, t, res, round(100*r["strict"]["iou"], 1), round(100*r["iem"]["iou"], 1), round(r["pos_only"], 2), flush=True)
json.dump(out, open(f"/work/scratch/s6/{tag}_v2.json", "w"), indent=1)
