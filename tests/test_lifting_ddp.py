"""gen-lifting under DDP: two gloo processes on the CPU, each a GenLiftingPipeline with world_size=2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_lifting_method import make_tiny_lego, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
WORLD = 2


def _worker(rank: int, store: str, data: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        pipe = tiny_config(Path(data)).pipeline.setup(device="cpu", test_mode="val", world_size=WORLD, local_rank=rank)
        assert isinstance(pipe._model, DDP) and pipe.model is pipe._model.module
        first_batch = pipe.datamanager.next_train(0)[1]["image_idx"].tolist()
        optimizer = torch.optim.Adam(pipe.model.parameters(), lr=1e-2)
        losses, grads = [], []
        for step in range(1, 3):
            _, loss_dict, _ = pipe.get_train_loss_dict(step)
            optimizer.zero_grad()
            loss = sum(loss_dict.values())
            loss.backward()  # DDP all-reduces (averages) the gradients here
            losses.append(float(loss))
            grads.append(float(pipe.model.pose_encoder.direction_head.weight.grad.abs().sum()))
            optimizer.step()
        params = torch.cat([p.detach().flatten() for p in pipe.model.parameters() if p.requires_grad])
        result = {"first_batch": first_batch, "losses": losses, "grads": grads, "param_sum": float(params.sum()),
                  "eval_batch": pipe.datamanager.next_eval_batch(5)["image_idx"].tolist()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_tiny_lego(root / "lego", n_train=12)
    mp.spawn(_worker, args=(str(root / "store"), str(data), str(root)), nprocs=WORLD, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_ranks_train_on_different_images(ranks):
    """Each rank draws its own batches (the generator is seeded with the rank): before the fix both ranks drew the
    same images, so N processes trained on one batch N times."""
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    assert ranks[0]["losses"] != ranks[1]["losses"]


def test_gradients_are_averaged_and_weights_stay_in_sync(ranks):
    assert ranks[0]["grads"] == pytest.approx(ranks[1]["grads"], rel=1e-6)  # all-reduced: the same on every rank
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-6)


def test_eval_batches_are_the_same_on_every_rank(ranks):
    """Eval batches come from their own stream, seeded by the step, not from the training stream or the rank."""
    assert ranks[0]["eval_batch"] == ranks[1]["eval_batch"]
