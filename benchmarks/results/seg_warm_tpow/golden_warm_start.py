"""golden warm-start: python warm.py ROOT plain_steps=P steps=S key=value... (plain DDPM P steps, then the
factorized recipe S steps from it; P=0: cold start). exp keys: variant n size seed dseed; rest TrainConfig overrides"""
import sys, time, dataclasses, json, shutil
sys.path.insert(0, "/work/main/tests"); sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
import seg_shapes
from factorized_seg.presets import PRESETS
from factorized_seg.trainer import train
from factorized_seg.segment import SegmentConfig, run_segment
from factorized_seg.evaluate import EvalConfig, evaluate
from seg import with_overrides, parse_value
from PIL import Image
root = Path(sys.argv[1]); over = dict(a.split("=", 1) for a in sys.argv[2:])
variant = over.pop("variant", "light"); n = int(over.pop("n", 48)); size = int(over.pop("size", 16))
steps = int(over.pop("steps", 250)); seed = int(over.pop("seed", 0)); dseed = int(over.pop("dseed", 0))
plain_steps = int(over.pop("plain_steps", 0))
shutil.rmtree(root, ignore_errors=True)
imgs, masks = seg_shapes.make_shapes(root / "data", n=n, size=size, seed=dseed, variant=variant)
base = with_overrides(PRESETS["cpu"], {k: parse_value(v) for k, v in over.items()})
common = dict(data=str(imgs), resolution=size, seed=seed, threads=1, progress=False, sample_every=0, checkpoint_every=0)
t0 = time.time()
init = None
if plain_steps:
    pcfg = dataclasses.replace(with_overrides(base, {"model.scheme": "plain"}), output_dir=root / "plain",
                               max_steps=plain_steps, **common)
    train(pcfg); init = root / "plain"
cfg = dataclasses.replace(base, output_dir=root / "run", max_steps=steps, init_from=init, **common)
train(cfg); tt = time.time() - t0
run_segment(SegmentConfig(run=root / "run", images=str(imgs), output_dir=root / "seg", save_overlays=False, progress=False))
res = evaluate(EvalConfig(pred=root / "seg" / "masks", masks=str(masks)))
pred = np.stack([np.asarray(Image.open(p)) for p in sorted((root / "seg" / "masks").glob("*.png"))])
print(json.dumps({"variant": variant, "size": size, "n": n, "plain_steps": plain_steps, "steps": steps, "seed": seed,
                  **over, "strict": round(res["strict"]["iou"], 3), "iem": round(res["iem"]["iou"], 3),
                  "shares": [round(float((pred == k).mean()), 3) for k in range(int(pred.max()) + 1)],
                  "train_s": round(tt)}))
