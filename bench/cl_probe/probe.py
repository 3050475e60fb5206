"""GPU probe: qdrop vs qdrop+CL settings on the reference models (not part of the repo)."""

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEADLINE = float(os.environ.get("PROBE_SECONDS", "470"))
T0 = time.time()


def run(spec):
    if time.time() - T0 > DEADLINE - 5:
        return {**spec, "skipped": True}
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from clcalib import calibrate
    from clcalib.graph.registry import build_model, read_state_dict

    d = np.load(HERE / "fmnist.npz")

    def prep(a):
        x = torch.from_numpy(a.copy()).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
        return (x - 0.286) / 0.353

    model = build_model(spec["model"], 10, read_state_dict(HERE / f"fmnist_{spec['model']}.safetensors"))
    w, a = int(spec["bits"][1]), int(spec["bits"][3])
    cfg = {"method": spec["method"], "w_bits": w, "a_bits": a, "iters": spec["iters"], "seed": spec["seed"],
           "calib_size": spec["calib"], "device": spec.get("device", "cuda"), **spec.get("cfg", {})}
    t = time.perf_counter()
    res = calibrate(model, prep(d["calib"]), cfg)
    secs = time.perf_counter() - t
    qm = res.model
    dev = next(qm.buffers()).device
    test, labels = prep(d["test"]), torch.from_numpy(d["test_labels"].astype(np.int64))
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 1000):
            correct += (qm(test[i:i + 1000].to(dev)).argmax(1).cpu() == labels[i:i + 1000]).sum().item()
    extra = {k: [round(v[0], 4), round(v[-1], 4)] for k, v in res.units[1].extra.items()}
    return {**spec, "top1": 100.0 * correct / len(test), "calib_s": round(secs, 1), "extra_unit1": extra}


def main():
    specs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    jobs = int(sys.argv[3])
    with ProcessPoolExecutor(jobs) as pool, out.open("a") as fh:
        futs = [pool.submit(run, s) for s in specs]
        for f in as_completed(futs):
            try:
                row = f.result()
            except Exception as e:
                row = {"error": f"{type(e).__name__}: {e}"}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
