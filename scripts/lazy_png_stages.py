"""Current and peak RSS of this process after each stage of a lazy PNG audit (in process, so
the DataLoader worker is not counted): python scripts/lazy_png_stages.py 20000 /tmp/lazy_png
(run scripts/lazy_png_audit.py first to write the PNGs and audit.yaml)."""
import resource, sys
from pathlib import Path
def rss():
    cur = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]
    return f"cur {int(cur)/1024:.0f} MB peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB"
size = int(sys.argv[1])
from influence_cli.config import load_config
from influence_cli.app.session import Session
from influence_cli.progress import Reporter
base = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/lazy_png")  # the folder lazy_png_audit.py wrote
cfg = load_config(str(base / "audit.yaml"), [f"name=probe-{size}", f"data.train_path=train-{size}", "data.in_memory=false", "influence.num_workers=1", f"output.dir={base / 'probe-runs'}"])
print("start", rss(), flush=True)
s = Session(cfg, Reporter())
d = s.data(); print("data", rss(), flush=True)
d.fingerprint("train"); print("fingerprint", rss(), flush=True)
from influence_cli.app.model import ensure_model
st = ensure_model(s); s.model_state = st; print("model", rss(), flush=True)
from influence_cli.app.factors import ensure_factors
fs = ensure_factors(s, st, "ekfac", refit_stale=True); print("factors", rss(), flush=True)
from influence_cli.app.scores import run_self_influence
r = run_self_influence(s); print("self-influence", rss(), flush=True)
