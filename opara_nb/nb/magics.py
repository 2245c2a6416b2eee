"""The IPython magics: ``%opara`` / ``%%opara``, ``%opara_profile``, ``%opara_undo``, ``%opara_bench``.

Thin by design: parse arguments, find the model and inputs, call the core API (``opara_nb.optimize`` / ``profile`` /
``benchmark``), publish a result object. Settings are traitlets, so ``%config OparaMagics.strategy = "nimble"`` works.
Errors raised by the model or the cell are shown short (``tracebacks``); ``-v`` / ``OparaMagics.verbose`` shows all.
"""
from __future__ import annotations

import builtins
import contextlib
import keyword
import types
import warnings
from typing import Any, Callable, Iterator

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Integer, Unicode, validate
from traitlets.config import Configurable

from .. import progress
from .._tensors import max_abs_diff
from ..capture.sandbox import Sandbox, clone_inputs
from ..errors import OparaUsageError
from ..schedule import ORDERS, STRATEGIES
from .display import OparaResult, ProfileResult, measured_timelines
from .options import (CellOptions, changed_names, find_inputs, find_model, parse_kwargs, split_names,
                      usage_error)
from .tracebacks import shorten

__all__ = ["OparaMagics", "STRATEGY_CHOICES", "ORDER_CHOICES"]

STRATEGY_CHOICES = ("auto", *STRATEGIES)
ORDER_CHOICES = ("", *ORDERS)  # "": each strategy's default launch order


def is_opara_module(obj: Any) -> bool:
    try:
        from ..runtime import OparaModule
    except ImportError:  # the runtime layer is optional for the magics' own checks
        return hasattr(obj, "original") and hasattr(obj, "release")
    return isinstance(obj, OparaModule)


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


def _describe(value: Any) -> str:
    """``float32 (1, 3, 224, 224) on cpu`` for a tensor, the type name otherwise."""
    shape = getattr(value, "shape", None)
    if shape is None or not hasattr(value, "dtype"):
        return type(value).__name__
    return f"{str(value.dtype).removeprefix('torch.')} {tuple(shape)} on {value.device}"


def _model_hint(model: Any, inputs: list[Any], kwargs: dict[str, Any], names: list[str], again: str
                ) -> Callable[[BaseException], str]:
    """The line under a short traceback of an error from the core: whether the model itself fails on these inputs
    (run once more, eagerly, on copies: only on this error path) and what to check."""
    def hint(exc: BaseException) -> str:
        from ..capture import model_error

        own = model_error(model, tuple(inputs), kwargs)
        params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        where = f"; the model's weights are {_describe(params)}" if params is not None else ""
        shown = "; ".join(f"{n} is {_describe(v)}" for n, v in zip(names, inputs))
        if own is not None and type(own) is type(exc):
            return (f"opara_nb: the model itself raises this on the example inputs ({shown}{where}): fix the inputs or "
                    f"the model and run again; full traceback: {again}")
        return (f"opara_nb: the model runs on these inputs without opara_nb, so this is opara_nb's failure: please "
                f"report it with the full traceback ({again})")
    return hint


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
    verbose = Bool(False, help="show full tracebacks and opara_nb's notices as warnings (like -v on every magic)"
                   ).tag(config=True)
    quiet = Bool(False, help="show nothing unless asked (like -q on every magic): no tables, pictures or progress"
                 ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        _drop_refused_config(shell)
        super().__init__(shell=shell, **kwargs)
        if shell is not None and self not in shell.configurables:
            shell.configurables.append(self)

    @validate("strategy")
    def _check_strategy(self, proposal: Any) -> str:
        return _choice("strategy", proposal["value"], STRATEGY_CHOICES)

    @validate("order")
    def _check_order(self, proposal: Any) -> str:
        return _choice("order", proposal["value"], ORDER_CHOICES)

    @validate("max_nodes", "bench_iters")
    def _check_count(self, proposal: Any) -> int:
        if proposal["value"] < 1:
            from traitlets import TraitError

            raise TraitError(f"{proposal['trait'].name} is a whole number of at least 1; got {proposal['value']!r}")
        return proposal["value"]

    # ----- %opara / %%opara ---------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", nargs="?", default=None,
              help="the model variable (cell form: default is the one nn.Module the cell assigned)")
    @argument("inputs", nargs="*", help="example input variables, as with --inputs")
    @argument("--inputs", "-i", dest="input_list", default=None,
              help="example inputs X[,Y...] (cell form: default is the tensors the cell assigned)")
    @argument("--kwargs", default=None, help="keyword inputs NAME=VARIABLE[,...], e.g. --kwargs mask=mask")
    @argument("--strategy", "-s", default=None, help=f"stream allocation: {', '.join(STRATEGY_CHOICES)}")
    @argument("--order", default=None, help=f"launch order: {', '.join(ORDERS)} (default: the strategy's own)")
    @argument("--fuse", action="store_true", help="also try operators fused into TorchInductor segments")
    @argument("--plan", default=None, metavar="PATH", help="load the plan from a plan file (skips profiling)")
    @argument("--max-memory-mb", type=float, default=None, metavar="N",
              help="keep only plans whose CUDA graph memory fits in N MiB (the report says what each takes)")
    @argument("--max-streams", type=int, default=None, metavar="N", help="run each plan on at most N CUDA streams")
    @argument("--reprofile", action="store_true", help="measure the profile again instead of using the cached one")
    @argument("--no-graph", action="store_true", help="do not show the stream graph")
    @argument("--bench", action="store_true", help="measure eager / sequential CUDA graph / opara latency")
    @argument("--dashboard", action="store_true", help="show a dashboard to try strategies and launch orders")
    @argument("-q", "--quiet", action="store_true", help="show nothing (no table, picture or progress bar)")
    @argument("-v", "--verbose", action="store_true", help="full tracebacks, and opara_nb's notices as warnings")
    @argument("-o", dest="return_result", action="store_true", help="return the result object")
    @argument("--store", dest="store_as", default=None, metavar="NAME",
              help="store the result object in variable NAME")
    @line_cell_magic
    def opara(self, line: str, cell: str | None = None) -> Any:
        """Replace a model by an OparaModule (one multi-stream CUDA graph) and show the result and the stream graph.

        Line form, for a model that already exists::

            %opara model x

        Cell form: run the cell, then optimize the model it built::

            %%opara model --inputs x
            model = build().eval().cuda()
            x = torch.randn(1, 3, 224, 224, device="cuda")

        The first line of the output is the result (on a GPU: the measured speed-up of the kept plan over a plain
        CUDA graph and over eager; on a CPU: "not accelerated" and why).
        """
        opts = self._cell_options(line)
        magic_line = f"%%opara {line}".rstrip() if cell is not None else f"%opara {line}".rstrip()
        again = f"{magic_line.split()[0]} ... -v"
        ns = self.shell.user_ns
        if cell is None:
            var, inputs, names, previous = self._line_model_and_inputs(opts)
        else:
            before = dict(ns)
            with self._short_errors(opts.verbose, magic_line, lambda exc: (
                    "opara_nb: the cell itself failed, before anything was optimized: fix it and run it again; "
                    f"full traceback: {again}")):
                self._run_cell_body(cell)
            changed = changed_names(ns, before, cell)
            var = find_model(ns, opts.model, changed)
            names = find_inputs(ns, opts.inputs, changed, var, opts.kwargs.values())
            inputs = [ns[n] for n in names]
            previous = before.get(var)
        kwargs = self._resolve_kwargs(opts.kwargs)
        model = ns[var].original if is_opara_module(ns[var]) else ns[var]
        with self._short_errors(opts.verbose, magic_line, _model_hint(model, inputs, kwargs, names, again)):
            result = self._optimize_and_rebind(var, previous, inputs, kwargs, opts)
        if opts.dashboard and not opts.quiet:
            from .widgets import dashboard

            display(dashboard(result.om, max_nodes=self.max_nodes))
        return self._publish(result, opts)

    def _cell_options(self, line: str) -> CellOptions:
        args = parse_argstring(self.opara, line)
        if args.inputs and args.input_list:
            raise usage_error("name the inputs once: either after the model (%opara model x) or with --inputs x")
        store_as = _store_name(args.store_as, [args.model, *args.inputs, *split_names(args.input_list)],
                               self.shell.user_ns)
        return CellOptions(model=args.model, inputs=list(args.inputs) or split_names(args.input_list),
                           kwargs=parse_kwargs(args.kwargs),
                           strategy=_choice("--strategy", args.strategy or self.strategy, STRATEGY_CHOICES, usage=True),
                           order=_choice("--order", args.order or self.order, ORDER_CHOICES, usage=True),
                           fuse=args.fuse, plan=args.plan, reprofile=args.reprofile,
                           max_memory_mb=_positive("--max-memory-mb", args.max_memory_mb),
                           max_streams=_positive("--max-streams", args.max_streams),
                           graph=self.graph and not args.no_graph, bench=args.bench, dashboard=args.dashboard,
                           quiet=self.quiet or args.quiet, verbose=self.verbose or args.verbose,
                           return_result=args.return_result, store_as=store_as)

    def _line_model_and_inputs(self, opts: CellOptions) -> tuple[str, list[Any], list[str], Any]:
        """Line form: the model variable and inputs must exist already."""
        ns = self.shell.user_ns
        if not opts.model:
            raise usage_error("name the model and its example inputs: %opara MODEL X [Y ...], or use the cell form "
                              "%%opara on the cell that builds the model")
        var = find_model(ns, opts.model, [], usage="%opara MODEL X")
        if not opts.inputs:
            raise usage_error(f"name the example inputs after the model: %opara {var} x [y ...]")
        names = find_inputs(ns, opts.inputs, [], var)
        return var, [ns[n] for n in names], names, ns[var]

    def _run_cell_body(self, cell: str) -> None:
        """Run the cell's code in the user's namespace, compiled under a cell name so that its lines show in
        tracebacks (the first line is the %%opara line, so line numbers match what the user sees)."""
        shell = self.shell
        source = "\n" + shell.transform_cell(cell)
        filename = shell.compile.cache(source, shell.execution_count, raw_code="\n" + cell)
        try:
            code = compile(source, filename, "exec")
        except SyntaxError:  # shown as IPython shows a plain cell's, without our frames
            shell.showsyntaxerror(filename)
            raise usage_error("the cell has a syntax error (shown above): fix it and run it again; nothing was "
                              "optimized") from None
        exec(code, shell.user_global_ns, shell.user_ns)  # noqa: S102 - the user's cell

    @contextlib.contextmanager
    def _short_errors(self, verbose: bool, magic_line: str, hint: Callable[[BaseException], str]) -> Iterator[None]:
        """Errors of the model or the cell propagate as themselves, shown short (see ``tracebacks``) unless
        verbose; our own usage errors stay one line."""
        try:
            yield
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if verbose:
                raise
            try:
                line = hint(exc)
            except Exception:  # noqa: BLE001 - finding what to say must not hide the error itself
                line = f"opara_nb: full traceback: {magic_line.split()[0]} ... -v"
            shorten(exc, self.shell, line, magic_line)
            raise

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
        options: dict[str, Any] = dict(strategy=opts.strategy, order=opts.order)
        if opts.fuse:
            options["fuse"] = True
        if opts.plan:
            options["plan"] = opts.plan
        if opts.max_memory_mb is not None:
            options["max_memory_mb"] = opts.max_memory_mb
        if opts.max_streams is not None:
            options["max_streams"] = opts.max_streams
        steps = 2 + opts.bench + (opts.graph and not opts.quiet)
        with self._quiet_if(opts), progress.task("opara", total=steps) as bar, warnings.catch_warnings():
            if not opts.verbose:  # the runtime warns when it cannot accelerate; the summary says so instead
                _ignore_opara_notices()
            bar.step("capture, profile, plan")
            with _reprofiling(opts.reprofile):
                om = _call_core(opara_nb.optimize, model, *inputs, **options, model_kwargs=kwargs)
            bar.step("check against the original")
            diff = None
            if self.check:  # each on its own copies of the inputs, the model's state and RNG put back after
                with torch.no_grad(), Sandbox(model):
                    (a, ka), (b, kb) = clone_inputs(tuple(inputs), kwargs), clone_inputs(tuple(inputs), kwargs)
                    diff = max_abs_diff(model(*a, **ka), om(*b, **kb))
            bench = None
            if opts.bench:
                bar.step("benchmark")
                bench = _call_core(opara_nb.benchmark, model, *inputs, modes="eager,cudagraph,opara",
                                   iters=self.bench_iters, **kwargs)
            measured = []
            if opts.graph and not opts.quiet:
                bar.step("measured timeline")
                measured = measured_timelines(om)
        # Release only once the new module exists, so a failure above leaves the namespace as the cell left it.
        for old in {id(o): o for o in (current, previous) if is_opara_module(o) and o is not om}.values():
            old.release()
        ns[var] = om
        return OparaResult(om, var, bench=bench, max_abs_diff=diff, show_graph=opts.graph, max_nodes=self.max_nodes,
                           measured=measured)

    @staticmethod
    def _quiet_if(opts: Any) -> Any:
        return progress.quiet() if opts.quiet else contextlib.nullcontext()

    def _publish(self, result: Any, opts: Any) -> Any:
        if opts.store_as:
            self.shell.user_ns[opts.store_as] = result
        if opts.return_result:
            return result
        if not opts.quiet:
            display(result)
        return None

    # ----- %opara_profile -------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="the model variable")
    @argument("inputs", nargs="*", help="example input variables")
    @argument("--top", type=int, default=20, help="show the N slowest operators per graph (default 20)")
    @argument("--reprofile", action="store_true", help="measure again instead of using the cached profile")
    @argument("--no-graph", action="store_true", help="do not show the stream graph")
    @argument("-q", "--quiet", action="store_true", help="show nothing (with -o or --store)")
    @argument("-v", "--verbose", action="store_true", help="full tracebacks")
    @argument("-o", dest="return_result", action="store_true", help="return the result object")
    @argument("--store", dest="store_as", default=None, metavar="NAME",
              help="store the result object in variable NAME")
    @line_magic
    def opara_profile(self, line: str) -> Any:
        """Per-operator profile (time, class, demand), the critical-path bound and the stream graph; changes nothing.

        Profiles are cached per user (``$OPARA_NB_CACHE_DIR``); the output says when a profile came from the cache,
        and ``--reprofile`` measures again. Example: ``%opara_profile model x --top 10``
        """
        import opara_nb

        args = parse_argstring(self.opara_profile, line)
        if args.top < 1:
            raise usage_error(f"--top must be at least 1, got {args.top}")
        opts = _Flags(args, self)
        model, inputs = self._model_and_inputs("opara_profile", args.model, args.inputs)
        magic_line = f"%opara_profile {line}".rstrip()
        hint = _model_hint(model, inputs, {}, args.inputs, "%opara_profile ... -v")
        with self._quiet_if(opts), progress.task("profile", total=1) as bar, \
                self._short_errors(opts.verbose, magic_line, hint):
            bar.step("capture and profile")
            mp = _call_core(opara_nb.profile, model, *inputs, cache=not args.reprofile)
        result = ProfileResult(mp, top=args.top, strategy=self.strategy, order=self.order,
                               show_graph=self.graph and not args.no_graph, max_nodes=self.max_nodes)
        return self._publish(result, opts)

    def _model_and_inputs(self, magic: str, name: str, input_names: list[str]) -> tuple[Any, list[Any]]:
        ns = self.shell.user_ns
        model_var = find_model(ns, name, [], usage=f"%{magic} MODEL X")
        model = ns[model_var]
        if is_opara_module(model):
            model = model.original
        if not input_names:
            raise usage_error(f"name the example inputs after the model: %{magic} {name} x [y ...]")
        return model, [ns[n] for n in find_inputs(ns, input_names, [], model_var)]

    # ----- %opara_undo ----------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="a variable that %%opara turned into an OparaModule")
    @argument("-q", "--quiet", action="store_true", help="say nothing")
    @line_magic
    def opara_undo(self, line: str) -> None:
        """Rebind MODEL to its original nn.Module and release the OparaModule (its CUDA graphs and memory pools)."""
        args = parse_argstring(self.opara_undo, line)
        ns = self.shell.user_ns
        if args.model not in ns:
            raise usage_error(f"no variable named {args.model!r}: pass the variable %opara rebound")
        om = ns[args.model]
        if not is_opara_module(om):
            raise usage_error(f"{args.model!r} is a {type(om).__name__}, not an OparaModule: nothing to undo")
        # Say what was really freed: on a CPU, or after a fallback, there never were CUDA graphs.
        accelerated = bool(getattr(getattr(om, "report", None), "accelerated", False))
        ns[args.model] = om.original
        om.release()
        if not (args.quiet or self.quiet):
            freed = "its CUDA graphs and their memory were released" if accelerated else \
                "it had no CUDA graphs to release (it was not accelerated)"
            print(f"{args.model} is the original {type(om.original).__name__} again; {freed}.")

    # ----- %opara_bench ---------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="the model variable (an OparaModule is measured from its original)")
    @argument("inputs", nargs="*", help="example input variables")
    @argument("--modes", default=None, help="comma-separated modes, e.g. eager,cudagraph,opara (default: all)")
    @argument("--iters", type=int, default=None, help="timed iterations per mode (default: OparaMagics.bench_iters)")
    @argument("-q", "--quiet", action="store_true", help="show nothing (with -o or --store)")
    @argument("-v", "--verbose", action="store_true", help="full tracebacks")
    @argument("-o", dest="return_result", action="store_true", help="return the BenchResult")
    @argument("--store", dest="store_as", default=None, metavar="NAME", help="store the BenchResult in variable NAME")
    @line_magic
    def opara_bench(self, line: str) -> Any:
        """Benchmark modes side by side on the same inputs (``opara_nb.benchmark``). Example: ``%opara_bench model x``

        The table shows only the columns that have values; ``-o`` / ``--store`` give the whole BenchResult.
        """
        import opara_nb

        args = parse_argstring(self.opara_bench, line)
        opts = _Flags(args, self)
        model, inputs = self._model_and_inputs("opara_bench", args.model, args.inputs)
        iters = args.iters if args.iters is not None else self.bench_iters
        hint = _model_hint(model, inputs, {}, args.inputs, "%opara_bench ... -v")
        with self._quiet_if(opts), progress.task("benchmark", total=1) as bar, \
                self._short_errors(opts.verbose, f"%opara_bench {line}".rstrip(), hint), warnings.catch_warnings():
            if not opts.verbose:  # the table's notes say why a mode was not accelerated
                _ignore_opara_notices()
            bar.step("benchmark")
            result = _call_core(opara_nb.benchmark, model, *inputs, modes=args.modes, iters=iters)
        if opts.store_as:
            self.shell.user_ns[opts.store_as] = result
        if opts.return_result:
            return result
        if not opts.quiet:
            from ..bench.demo import compact

            display(compact(result))
        return None


class _Flags:
    """The flags every magic shares (-q, -v, -o, --store), with the %config defaults applied."""

    def __init__(self, args: Any, magics: OparaMagics) -> None:
        self.quiet = magics.quiet or bool(getattr(args, "quiet", False))
        self.verbose = magics.verbose or bool(getattr(args, "verbose", False))
        self.return_result = bool(getattr(args, "return_result", False))
        taken = [getattr(args, "model", None), *getattr(args, "inputs", ())]
        self.store_as = _store_name(getattr(args, "store_as", None), taken, magics.shell.user_ns)


def _reprofiling(on: bool) -> Any:
    if not on:
        return contextlib.nullcontext()
    from ..profiling import refreshing

    return refreshing()


def _drop_refused_config(shell: Any) -> None:
    """A value ``%config`` refused (logged as an error) still sits in the shell's config, where loading the magics
    again (``%reload_ext opara_nb``) would fail on it: drop it, saying so, and the default applies."""
    section = getattr(shell, "config", {}).get("OparaMagics") if shell is not None else None
    if not section:
        return
    def count(v: Any) -> bool:
        return isinstance(v, int) and v >= 1

    valid = {"strategy": lambda v: v in STRATEGY_CHOICES, "order": lambda v: v in ORDER_CHOICES,
             "max_nodes": count, "bench_iters": count}
    for name, ok in valid.items():
        if name in section and not ok(section[name]):
            warnings.warn(f"opara_nb: %config OparaMagics.{name} = {section[name]!r} was refused; using the default",
                          stacklevel=2)
            del section[name]


def _choice(what: str, value: str, choices: tuple[str, ...], usage: bool = False) -> str:
    if value in choices:
        return value
    named = ", ".join(repr(c) if not c else c for c in choices)  # '' (each strategy's own order) shows as ''
    message = f"{what} must be one of {named}; got {value!r}"
    if usage:
        raise usage_error(message)
    from traitlets import TraitError

    raise TraitError(message)


def _positive(flag: str, value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise usage_error(f"{flag} takes a number above 0, got {value:g}")
    return value


def _store_name(name: str | None, taken: list[str | None], ns: dict[str, Any]) -> str | None:
    """``--store NAME``, refused where the result would replace the model or an input, or hide a module or a
    builtin the notebook uses (``--store torch``, ``--store print``)."""
    if name is None:
        return None
    if not name.isidentifier() or keyword.iskeyword(name):
        raise usage_error(f"--store takes a variable name, got {name!r}")
    if name in taken:
        raise usage_error(f"--store {name} would overwrite the model or an input: store the result under another "
                          f"name (--store {name}_result)")
    hidden = "module" if isinstance(ns.get(name), types.ModuleType) else \
        "builtin" if name not in ns and hasattr(builtins, name) else None
    if hidden:
        raise usage_error(f"--store {name} would hide the {hidden} {name}: store the result under another name "
                          f"(--store {name}_result)")
    return name
