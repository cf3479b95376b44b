"""OrionStudent._parse_losses under 2 Gloo ranks on the CPU: averaged logs, and differing keys fail with a message."""
from __future__ import annotations

import multiprocessing
import queue
import traceback
from typing import Dict, List

import pytest

WORLD = 2


def _rank_main(rank: int, init_file: str, keys_per_rank: List[List[str]], results: "multiprocessing.Queue") -> None:
    try:
        import torch
        import torch.distributed as dist

        from mmcv.models.detectors.orion_student import OrionStudent
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD)
        try:
            losses: Dict[str, torch.Tensor] = {key: torch.tensor(float(rank + 1 + i))
                                               for i, key in enumerate(keys_per_rank[rank])}
            losses["total_loss"] = torch.tensor(10.0 * (rank + 1), requires_grad=True)
            loss, log_vars = OrionStudent._parse_losses(None, losses)
            results.put((rank, "ok", dict(log_vars), float(loss)))
        except Exception as err:  # reported to the test, which asserts on the message
            results.put((rank, "error", f"{type(err).__name__}: {err}", None))
        finally:
            dist.destroy_process_group()
    except Exception:
        results.put((rank, "crash", traceback.format_exc(), None))


def run_ranks(tmp_path, keys_per_rank: List[List[str]], timeout: float = 120.0):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "rendezvous")
    procs = [ctx.Process(target=_rank_main, args=(r, init_file, keys_per_rank, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    collected = {}
    try:
        for _ in range(WORLD):
            rank, status, payload, loss = results.get(timeout=timeout)
            collected[rank] = (status, payload, loss)
    except queue.Empty:
        pytest.fail(f"_parse_losses hung: only ranks {sorted(collected)} answered within {timeout:.0f} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return collected


def test_log_values_are_averaged_over_two_gloo_ranks(tmp_path):
    got = run_ranks(tmp_path, [["task_loss", "feature_distill_loss"]] * 2)
    for rank in range(WORLD):
        status, log_vars, loss = got[rank]
        assert status == "ok", log_vars
        assert loss == 10.0 * (rank + 1)  # each rank optimises its own loss
        assert log_vars["total_loss"] == pytest.approx(15.0) and log_vars["loss"] == pytest.approx(15.0)
        # sorted keys: feature_distill_loss is rank+1+1, task_loss rank+1+0 -> means 2.5 and 1.5
        assert log_vars["feature_distill_loss"] == pytest.approx(2.5) and log_vars["task_loss"] == pytest.approx(1.5)


@pytest.mark.parametrize("keys_per_rank, only_on", [
    ([["task_loss", "feature_distill_loss"], ["task_loss", "attention_distill_loss"]],
     ("feature_distill_loss", "attention_distill_loss")),
    ([["task_loss"], ["task_loss", "dn_loss_cls"]], ("dn_loss_cls",)),
])
def test_differing_log_keys_fail_on_every_rank_with_the_keys_named(tmp_path, keys_per_rank, only_on):
    got = run_ranks(tmp_path, keys_per_rank)
    for rank in range(WORLD):
        status, message, _ = got[rank]
        assert status == "error", (rank, message)
        assert "ranks log different keys" in message, message
        for key in only_on:
            assert key in message, message
