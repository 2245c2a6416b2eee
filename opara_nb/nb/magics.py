"""The IPython magics: ``%%opara``, ``%opara_profile``, ``%opara_undo``, ``%opara_bench``.

Thin by design: parse arguments, find the model and inputs, call the core API (``opara_nb.optimize`` / ``profile`` /
``benchmark``), publish a result object. Settings are traitlets, so ``%config OparaMagics.strategy = "nimble"`` works.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Integer, Unicode, validate
from traitlets.config import Configurable

from ..errors import OparaUsageError
from ..schedule import ORDERS, STRATEGIES
from .display import OparaResult, ProfileResult
from .options import (CellOptions, changed_names, find_inputs, find_model, parse_kwargs, split_names,
                      usage_error)
from .progress import Progress

__all__ = ["OparaMagics", "STRATEGY_CHOICES", "ORDER_CHOICES"]

STRATEGY_CHOICES = ("auto", *STRATEGIES)
ORDER_CHOICES = ("", *ORDERS)  # "": each strategy's default launch order


def is_opara_module(obj: Any) -> bool:
    try:
        from ..runtime import OparaModule
    except ImportError:  # the runtime layer is optional for the magics' own checks
        return hasattr(obj, "original") and hasattr(obj, "release")
    return isinstance(obj, OparaModule)


def _leaves(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [x for v in out.values() for x in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [x for v in out for x in _leaves(v)]
    to_tuple = getattr(out, "to_tuple", None)  # HuggingFace ModelOutput
    return _leaves(to_tuple()) if callable(to_tuple) else []


def max_abs_diff(a: Any, b: Any) -> float | None:
    """Largest |a - b| over the floating-point tensors of two outputs; None when they cannot be compared."""
    la, lb = _leaves(a), _leaves(b)
    if not la or len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        return None
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(la, lb)
             if x.numel() and x.is_floating_point()]
    return max(diffs, default=0.0)


def _ignore_opara_notices() -> None:
    try:
        from ..runtime import OparaNotice
    except ImportError:  # no runtime layer: nothing to silence
        return
    warnings.simplefilter("ignore", OparaNotice)


def _call_core(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the core; a user mistake it reports becomes a UsageError (message kept) so IPython shows no traceback."""
    try:
        return fn(*args, **kwargs)
    except OparaUsageError as exc:
        raise usage_error(str(exc)) from exc


@magics_class
class OparaMagics(Magics, Configurable):
    """opara_nb's magics; options via ``%config OparaMagics.<name> = value``."""

    strategy = Unicode("auto", help="stream allocation: auto, opara, nimble, wavefront or sequential").tag(config=True)
    order = Unicode("", help="launch order: opara (paper Alg. 2), topological, or empty for each strategy's "
                    "default").tag(config=True)
    graph = Bool(True, help="show the stream graph and timeline under %%opara and %opara_profile").tag(config=True)
    max_nodes = Integer(150, help="collapse graphs with more operators than this (chains / module groups)"
                        ).tag(config=True)
    bench_iters = Integer(200, help="timed iterations per mode for --bench and %opara_bench").tag(config=True)
    check = Bool(True, help="compare the OparaModule's output with the original's (max abs diff)").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        if shell is not None and self not in shell.configurables:
            shell.configurables.append(self)

    @validate("strategy")
    def _check_strategy(self, proposal: Any) -> str:
        return _choice("strategy", proposal["value"], STRATEGY_CHOICES)

    @validate("order")
    def _check_order(self, proposal: Any) -> str:
        return _choice("order", proposal["value"], ORDER_CHOICES)

    # ----- %%opara -----------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", nargs="?", default=None, help="the model variable (default: the one nn.Module the cell assigned)")
    @argument("--inputs", "-i", default=None, help="example inputs X[,Y...] (default: the tensors the cell assigned)")
    @argument("--kwargs", default=None, help="keyword inputs NAME=VARIABLE[,...], e.g. --kwargs mask=mask")
    @argument("--strategy", "-s", default=None, help=f"stream allocation: {', '.join(STRATEGY_CHOICES)}")
    @argument("--order", default=None, help=f"launch order: {', '.join(ORDERS)} (default: the strategy's own)")
    @argument("--no-graph", action="store_true", help="do not show the stream graph")
    @argument("--bench", action="store_true", help="measure eager / sequential CUDA graph / opara latency")
    @argument("--dashboard", action="store_true", help="show a dashboard to try strategies and launch orders")
    @argument("-o", dest="return_result", action="store_true", help="return the result object")
    @argument("-v", dest="store_as", default=None, metavar="NAME", help="store the result object in variable NAME")
    @cell_magic
    def opara(self, line: str, cell: str) -> Any:
        """Run the cell, then replace its model by an OparaModule (multi-stream CUDA graph) and show what changed.

        Example::

            %%opara model --inputs x
            model = build().eval().cuda()
            x = torch.randn(1, 3, 224, 224, device="cuda")
        """
        opts = self._cell_options(line)
        ns = self.shell.user_ns
        before = dict(ns)
        self.shell.ex(self.shell.transform_cell(cell))
        changed = changed_names(ns, before, cell)
        var = find_model(ns, opts.model, changed)
        inputs = find_inputs(ns, opts.inputs, changed, var)
        kwargs = self._resolve_kwargs(opts.kwargs)
        result = self._optimize_and_rebind(var, before.get(var), inputs, kwargs, opts)
        if opts.dashboard:
            from .widgets import dashboard

            display(dashboard(result.om, max_nodes=self.max_nodes))
        return self._publish(result, opts.return_result, opts.store_as)

    def _cell_options(self, line: str) -> CellOptions:
        args = parse_argstring(self.opara, line)
        return CellOptions(model=args.model, inputs=split_names(args.inputs), kwargs=parse_kwargs(args.kwargs),
                           strategy=_choice("--strategy", args.strategy or self.strategy, STRATEGY_CHOICES, usage=True),
                           order=_choice("--order", args.order or self.order, ORDER_CHOICES, usage=True),
                           graph=self.graph and not args.no_graph, bench=args.bench, dashboard=args.dashboard,
                           return_result=args.return_result, store_as=_store_name(args.store_as))

    def _resolve_kwargs(self, names: dict[str, str]) -> dict[str, Any]:
        ns = self.shell.user_ns
        unknown = [v for v in names.values() if v not in ns]
        if unknown:
            raise usage_error(f"no variable named {unknown[0]!r}: --kwargs takes NAME=VARIABLE with existing variables")
        return {k: ns[v] for k, v in names.items()}

    def _optimize_and_rebind(self, var: str, previous: Any, inputs: list[Any], kwargs: dict[str, Any],
                             opts: CellOptions) -> OparaResult:
        import torch

        import opara_nb

        ns = self.shell.user_ns
        current = ns[var]
        # Re-running the cell: optimize the original again, never an OparaModule inside an OparaModule.
        model = current.original if is_opara_module(current) else current
        with Progress("opara", total=3 if opts.bench else 2) as progress, warnings.catch_warnings():
            # The runtime warns once when it cannot accelerate; the summary table shows that reason instead.
            _ignore_opara_notices()
            progress(0, what="capture, profile, plan")
            om = _call_core(opara_nb.optimize, model, *inputs, strategy=opts.strategy, order=opts.order, **kwargs)
            progress(1, what="check vs eager")
            diff = None
            if self.check:
                with torch.no_grad():
                    diff = max_abs_diff(model(*inputs, **kwargs), om(*inputs, **kwargs))
            bench = None
            if opts.bench:
                progress(2, what="benchmark")
                bench = _call_core(opara_nb.benchmark, model, *inputs, modes="eager,cudagraph,opara",
                                   iters=self.bench_iters, **kwargs)
        # Release only once the new module exists, so a failure above leaves the namespace as the cell left it.
        for old in {id(o): o for o in (current, previous) if is_opara_module(o) and o is not om}.values():
            old.release()
        ns[var] = om
        return OparaResult(om, var, bench=bench, max_abs_diff=diff, show_graph=opts.graph, max_nodes=self.max_nodes)

    def _publish(self, result: Any, return_result: bool, store_as: str | None) -> Any:
        if store_as:
            self.shell.user_ns[store_as] = result
        if return_result:
            return result
        display(result)
        return None

    # ----- %opara_profile -------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="the model variable")
    @argument("inputs", nargs="*", help="example input variables")
    @argument("--top", type=int, default=20, help="show the N slowest operators per graph (default 20)")
    @argument("--no-graph", action="store_true", help="do not show the stream graph")
    @argument("-o", dest="return_result", action="store_true", help="return the result object")
    @argument("-v", dest="store_as", default=None, metavar="NAME", help="store the result object in variable NAME")
    @line_magic
    def opara_profile(self, line: str) -> Any:
        """Per-operator profile (time, class, demand), the critical-path bound and the stream graph; changes nothing.

        Example: ``%opara_profile model x --top 10``
        """
        import opara_nb

        args = parse_argstring(self.opara_profile, line)
        if args.top < 1:
            raise usage_error(f"--top must be at least 1, got {args.top}")
        model, inputs = self._model_and_inputs("opara_profile", args.model, args.inputs)
        with Progress("profile", total=1) as progress:
            progress(0, what="capture and profile")
            mp = _call_core(opara_nb.profile, model, *inputs)
        result = ProfileResult(mp, top=args.top, strategy=self.strategy, order=self.order,
                               show_graph=self.graph and not args.no_graph, max_nodes=self.max_nodes)
        return self._publish(result, args.return_result, _store_name(args.store_as))

    def _model_and_inputs(self, magic: str, name: str, input_names: list[str]) -> tuple[Any, list[Any]]:
        ns = self.shell.user_ns
        model_var = find_model(ns, name, [])
        model = ns[model_var]
        if is_opara_module(model):
            model = model.original
        if not input_names:
            raise usage_error(f"name the example inputs after the model: %{magic} {name} x [y ...]")
        return model, find_inputs(ns, input_names, [], model_var)

    # ----- %opara_undo ----------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="a variable that %%opara turned into an OparaModule")
    @line_magic
    def opara_undo(self, line: str) -> None:
        """Rebind MODEL to its original nn.Module and release the OparaModule's CUDA graphs and memory pools."""
        args = parse_argstring(self.opara_undo, line)
        ns = self.shell.user_ns
        if args.model not in ns:
            raise usage_error(f"no variable named {args.model!r}: pass the variable %%opara rebound")
        om = ns[args.model]
        if not is_opara_module(om):
            raise usage_error(f"{args.model!r} is a {type(om).__name__}, not an OparaModule: nothing to undo")
        ns[args.model] = om.original
        om.release()
        print(f"{args.model} is the original {type(om.original).__name__} again; its CUDA graphs were released.")

    # ----- %opara_bench ---------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="the model variable (an OparaModule is measured from its original)")
    @argument("inputs", nargs="*", help="example input variables")
    @argument("--modes", default=None, help="comma-separated modes, e.g. eager,cudagraph,opara (default: all)")
    @argument("--iters", type=int, default=None, help="timed iterations per mode (default: OparaMagics.bench_iters)")
    @argument("-o", dest="return_result", action="store_true", help="return the BenchResult")
    @argument("-v", dest="store_as", default=None, metavar="NAME", help="store the BenchResult in variable NAME")
    @line_magic
    def opara_bench(self, line: str) -> Any:
        """Benchmark modes side by side on the same inputs (``opara_nb.benchmark``). Example: ``%opara_bench model x``"""
        import opara_nb

        args = parse_argstring(self.opara_bench, line)
        model, inputs = self._model_and_inputs("opara_bench", args.model, args.inputs)
        iters = args.iters if args.iters is not None else self.bench_iters
        with Progress("benchmark", total=1) as progress:
            progress(0, what="benchmark")
            result = _call_core(opara_nb.benchmark, model, *inputs, modes=args.modes, iters=iters)
        return self._publish(result, args.return_result, _store_name(args.store_as))


def _choice(what: str, value: str, choices: tuple[str, ...], usage: bool = False) -> str:
    if value in choices:
        return value
    message = f"{what} must be one of {', '.join(choices)}; got {value!r}"
    if usage:
        raise usage_error(message)
    from traitlets import TraitError

    raise TraitError(message)


def _store_name(name: str | None) -> str | None:
    if name is not None and not name.isidentifier():
        raise usage_error(f"-v takes a variable name, got {name!r}")
    return name
