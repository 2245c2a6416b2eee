"""Never slower than a plain CUDA graph: OparaModule's default against a hand-written ``torch.cuda.CUDAGraph`` of the
same model, on models beyond the paper's six, in one process. Run on the GPU machine from the checkout root:

    PYTHONPATH=. python benchmarks/never_slower.py [--md FILE] [--models a,b,...] [--iters 200] [--fuse]

Per model: the plain graph (``bench.modes.PlainCudaGraph``: copy inputs, replay, return the static outputs) and
``opara_nb.optimize(model, x)`` (strategy "auto"), timed synchronously (call, then synchronize) in interleaved rounds
so drift is shared; medians in ms. "margin" is plain / default (>= 1: not slower). The graph pools are those `auto`
captured (``report.graph_memory_mb``): the plain graph's and the kept plan's. TF32 is off so the outputs can be
compared with eager (max abs diff, and relative: over the largest output value). ``--fuse``: the default with
``fuse=True`` (TorchInductor's fused segments among the candidates). Models are built from code or configs with
random weights (no downloads).
"""
from __future__ import annotations

import argparse
import statistics
import time
import traceback
import warnings
from typing import Any, Callable

import torch

import opara_nb
from benchmarks._table import emit
from opara_nb.bench.modes import PlainCudaGraph


def _vision(name: str) -> Callable[[], tuple]:
    def build() -> tuple:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        return model, (torch.randn(1, 3, 224, 224),), {}

    return build


def _timm(name: str) -> Callable[[], tuple]:
    def build() -> tuple:
        import timm

        model = timm.create_model(name, pretrained=False)
        return model, (torch.randn(1, 3, 224, 224),), {}

    return build


def _hf(config_cls: str, model_cls: str, vocab: int = 30000, seq: int = 128, **config: Any) -> Callable[[], tuple]:
    def build() -> tuple:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        model = getattr(transformers, model_cls)(cfg)
        ids = torch.randint(0, min(vocab, cfg.vocab_size), (1, seq))
        return model, (ids,), {}

    return build


def _bundled(name: str) -> Callable[[], tuple]:
    def build() -> tuple:
        from opara_nb import models

        return models.get(name)

    return build


MODELS: dict[str, Callable[[], tuple]] = {
    "resnet50": _vision("resnet50"),
    "mobilenet_v3_small": _vision("mobilenet_v3_small"),
    "efficientnet_b0": _vision("efficientnet_b0"),
    "densenet121": _vision("densenet121"),
    "squeezenet1_1": _vision("squeezenet1_1"),
    "shufflenet_v2_x1_0": _vision("shufflenet_v2_x1_0"),
    "regnet_y_400mf": _vision("regnet_y_400mf"),
    "convnext_tiny": _vision("convnext_tiny"),
    "timm vit_small_patch16_224": _timm("vit_small_patch16_224"),
    "timm mixnet_s": _timm("mixnet_s"),
    "distilbert": _hf("DistilBertConfig", "DistilBertModel"),
    "gpt2 (2 layers)": _hf("GPT2Config", "GPT2Model", n_layer=2),
    # decoders return their KV cache (an object pytree does not open): copied per call, 2 tensors per layer
    "gpt2 (12 layers)": _hf("GPT2Config", "GPT2Model"),
    "llama (4 layers 512 wide)": _hf("LlamaConfig", "LlamaModel", hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "bundled deepfm": _bundled("deepfm"),
    "bundled tiny_transformer": _bundled("tiny_transformer"),
}


def _to(obj: Any, device: str) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def _sync_ms(calls: dict[str, Callable[[], Any]], iters: int, rounds: int = 5) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in calls}
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for k, call in calls.items():
            for _ in range(5):
                call()
            torch.cuda.synchronize()
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                samples[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _diff(a: Any, b: Any) -> float:
    la = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(la) != len(lb) or not la:
        return float("nan")
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(la, lb))


def _scale(a: Any) -> float:
    leaves = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor) and t.numel()]
    return max((t.float().abs().max().item() for t in leaves), default=float("nan"))


def measure(name: str, build: Callable[[], tuple], iters: int, fuse: bool = False) -> str:
    model, args, kwargs = build()
    model = model.eval().cuda()
    args, kwargs = _to(args, "cuda"), _to(kwargs, "cuda")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PlainCudaGraph(model, args, kwargs)
        start = time.perf_counter()
        om = opara_nb.optimize(model, *args, fuse=fuse, **kwargs)
        plan_s = time.perf_counter() - start
        diff = _diff(om(*args, **kwargs), expected)
    rep = om.report
    times = _sync_ms({"plain": lambda: plain(*args, **kwargs), "default": lambda: om(*args, **kwargs)}, iters)
    margin = times["plain"] / times["default"]
    auto_plain = (rep.candidates.get("cudagraph") or {}).get("sync_ms")
    auto_kept = (rep.candidates.get(rep.kept) or {}).get("sync_ms")
    own = f"{auto_plain / auto_kept:.2f}x" if auto_plain and auto_kept else "-"
    pools = rep.graph_memory_mb
    memory = (f"{pools['cudagraph']:.0f} / {pools[rep.kept]:.0f} ({pools[rep.kept] / pools['cudagraph']:.1f}x)"
              if pools.get("cudagraph") and rep.kept in pools else "-")
    plain.release()
    om.release()
    return (f"| {name} | {times['plain']:.3f} | {times['default']:.3f} | {margin:.2f}x | {rep.mode} | {rep.kept} | "
            f"{own} | {memory} | {diff:.1e} ({diff / _scale(expected):.0e}) | {plan_s:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", default=None)
    parser.add_argument("--models", default=None, help="comma list (default: all)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--fuse", action="store_true", help="the default with fuse=True")
    ns = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    names = ns.models.split(",") if ns.models else list(MODELS)
    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, batch 1, fp32, TF32 off; "
             f"command: PYTHONPATH=. python benchmarks/never_slower.py --iters {ns.iters}{' --fuse' * ns.fuse}", "",
             "| model | plain CUDA graph ms | opara_nb default ms | margin | mode | kept | auto's own measured "
             "margin | graph pool MiB, plain / kept | max abs diff vs eager (relative) | optimize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        try:
            lines.append(measure(name, MODELS[name], ns.iters, ns.fuse))
        except Exception as exc:  # noqa: BLE001 - one model's failure must not cost the others their numbers
            traceback.print_exc()
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    emit(lines, ns.md)


if __name__ == "__main__":
    main()
