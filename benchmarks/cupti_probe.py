"""Does profiling slow later CUDA-graph launches? Host time of replay() for a plain GoogLeNet graph, before and after
opara_nb profiles the model. Run on a GPU machine: `PYTHONPATH=. python benchmarks/cupti_probe.py 0` (TEARDOWN_CUPTI=0:
Kineto's default, CUPTI stays attached) and `... 1` (what opara_nb requests by itself now). Output: (median launch ms,
median launch+sync ms)."""
import os, sys, time, statistics, torch, warnings
warnings.simplefilter("ignore")
os.environ["TEARDOWN_CUPTI"] = sys.argv[1]  # an explicit setting: opara_nb respects it
from opara_nb.models import get
from opara_nb.capture import capture_graphs
from opara_nb.profiling import profile_graph

def launch_cost(g, n=300):
    ls, tot = [], []
    for _ in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter(); g.replay(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        ls.append(t1 - t0); tot.append(t2 - t0)
    return round(statistics.median(ls) * 1e3, 4), round(statistics.median(tot) * 1e3, 4)

model, args, kwargs = get("googlenet", device="cuda")
with torch.no_grad():
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): model(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): y = model(*args)
print("TEARDOWN", os.environ.get("TEARDOWN_CUPTI"), "before profiling", launch_cost(g))
graphs = capture_graphs(model, args, kwargs)
for i in range(2):
    p = profile_graph(graphs[0], cache=False)
    print(" profiled", i, "has_gpu", p.has_gpu_data, "kernels", sum(len(n.kernels) for n in p.nodes.values()))
    print("TEARDOWN", os.environ.get("TEARDOWN_CUPTI"), "after profiling", launch_cost(g))
time.sleep(1)
print("after 1s", launch_cost(g))
