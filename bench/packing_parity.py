"""Packed vs unpacked training on the same samples at Qwen3-VL-8B scale: the loss curves over 20 steps.

    python bench/packing_parity.py --out bench/results/packing-parity        # on one GPU (about 3 minutes)
    python bench/packing_parity.py --shape tiny --steps 4                    # the same code path on a CPU
    python bench/packing_parity.py --attn varlen                             # packed rows on the varlen kernel

One base model (the random-weight 8B shape of bench/train_gpu.py), two LoRA adapters with the same initial
weights, each with its own AdamW: step s trains adapter "packed" on packed row s (whole samples of the varlen
workload, per-sample mRoPE positions, attention kept within each sample) and adapter "unpacked" on the same
samples as one padded batch (attention mask). The loss of a step is the per-token mean over all its assistant
tokens in both, so in exact arithmetic the two curves are the same curve; in bf16 they differ only by the
different kernels and reduction orders. The table (last) shows both losses per step, their difference, and
how far the adapters' weights have drifted apart after the last step. Both run the project's bf16 recipe with
gradient checkpointing (no CUDA graphs: the comparison is about packing, and the unpacked batches vary in shape).

Exact fp32 equivalence (loss and every LoRA gradient) on the tiny model is `tests/unit/test_packing.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_gpu import IDS, PACKED_LENGTH, make_model, padded_collate, varlen_samples  # noqa: E402

RTOL = 1.6e-2  # bf16's customary comparison tolerance (torch.testing's default for bfloat16)


def run(shape: str, model_dir: Path, steps: int, attn: str = "sdpa") -> dict:
    import torch

    from trainer.config import TrainConfig
    from trainer.packing import RopeIndex, join_row, pack, stack_rows
    from trainer.train import prepare_model

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    config = TrainConfig.load(ROOT / "trainer" / "configs" / "qwen3-vl-8b-lora.yaml",
                              {"base_model": str(model_dir), "cuda_graphs": False, "gradient_checkpointing": True,
                               "packing": True, "attn_implementation": attn})
    model, _, _ = prepare_model(config)
    model.add_adapter("unpacked", model.peft_config["default"])
    with torch.no_grad():  # the same initial adapter weights (peft would draw new lora_A for the second)
        params = dict(model.named_parameters())
        for name, p in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".unpacked.")].copy_(p)
    device = "cuda" if cuda else "cpu"
    pool = varlen_samples(8 * steps)
    lengths = {i: len(x["input_ids"]) for i, x in enumerate(pool)}
    rows = sorted(pack(lengths, PACKED_LENGTH, seed=0), key=min)[:steps]
    rope = RopeIndex.of(model)
    padded = padded_collate(None)
    optimizers = {}
    for name in ("default", "unpacked"):
        model.set_adapter(name)
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                                             weight_decay=0.0)
    model.train()
    out = {"steps": [], "shape": shape, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    for s, row in enumerate(rows):
        samples = [pool[i] for i in row]
        batches = {"default": stack_rows([join_row(samples, PACKED_LENGTH, IDS["pad"], rope)]),
                   "unpacked": padded(samples)}
        step = {"samples": len(samples), "tokens": sum(len(x["input_ids"]) for x in samples),
                "padded_tokens": int(batches["unpacked"]["input_ids"].numel())}
        for name, batch in batches.items():
            model.set_adapter(name)
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch).loss
            loss.backward()
            trainable = [p for p in model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            key = "packed" if name == "default" else "unpacked"
            step[f"{key}_loss"], step[f"{key}_grad_norm"] = loss.item(), norm.item()
            step[f"{key}_seconds"] = time.perf_counter() - t0
        out["steps"].append(step)
        print(f"step {s}: packed {step['packed_loss']:.5f} unpacked {step['unpacked_loss']:.5f}", flush=True)
    with torch.no_grad():
        params = dict(model.named_parameters())
        drift = max((params[n] - params[n.replace(".default.", ".unpacked.")]).norm().item() / max(p.norm().item(), 1e-12)
                    for n, p in params.items() if ".default." in n and "lora_B" in n)
    out["lora_b_relative_drift"] = drift
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def table(result: dict) -> str:
    head = f"{'step':>4}{'samples':>9}{'tokens':>8}{'padded':>8}{'packed loss':>13}{'unpacked loss':>15}{'|diff|':>9}{'rel':>9}"
    lines = [f"packed vs unpacked, same samples per step; {result['shape']} shape on {result['device']}", head,
             "-" * len(head)]
    worst = 0.0
    for i, st in enumerate(result["steps"]):
        diff = abs(st["packed_loss"] - st["unpacked_loss"])
        rel = diff / abs(st["unpacked_loss"])
        worst = max(worst, rel)
        lines.append(f"{i:>4}{st['samples']:>9}{st['tokens']:>8}{st['padded_tokens']:>8}{st['packed_loss']:>13.5f}"
                     f"{st['unpacked_loss']:>15.5f}{diff:>9.5f}{rel:>9.2e}")
    verdict = "within" if worst <= RTOL else "OUTSIDE"
    lines.append(f"largest relative loss difference over {len(result['steps'])} steps: {worst:.2e} ({verdict} bf16 "
                 f"tolerance {RTOL:g}); adapters' lora_B relative drift after the last step: "
                 f"{result['lora_b_relative_drift']:.2e}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["8b", "tiny"], default="8b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model-dir", type=Path, default=None, help="where the random model is (default /tmp)")
    p.add_argument("--attn", choices=["sdpa", "varlen"], default="sdpa",
                   help="attention of both adapters' steps (varlen: the packed rows through the variable-length "
                        "kernel; the padded batches stay on SDPA, see trainer/attention.py)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "packing-parity")
    args = p.parse_args()
    model_dir = args.model_dir or Path("/tmp") / f"qwen3-vl-{args.shape}-random"
    make_model(args.shape, model_dir)
    result = run(args.shape, model_dir, args.steps, args.attn)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    text = table(result)
    (args.out / "table.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
