"""innards bench glp's two halves on a tiny store: the timed training (in-process here) and FD against evaluations."""

from __future__ import annotations

import math


def test_bench_glp_parts(tiny_model_dir, tmp_path):
    from test_glp_eval import make_tiny_store

    from innards.bench.glp import _child_train, fd_by_nfe
    from innards.data.store import ActivationStore
    from innards.glp.model import GLP

    store = make_tiny_store(tmp_path, tiny_model_dir("llama"), tokens=3000)
    train = dict(acts=str(store), out=str(tmp_path / "t"), depth=1, batch_size=128, steps=4, log_every=2, val_every=10**9,
                 checkpoints=1, save_every=10**9, precision="fp32", val_rows=0, overwrite=True, progress=False)
    res = _child_train({"train": train, "threads": None})
    assert res["precision"] == "fp32" and res["train_activations_per_s"] > 0 and 0 < res["mfu"]
    glp = GLP.from_pretrained(tmp_path / "t")
    st = ActivationStore(store)
    real = st.rows(st.split_rows("val")[:64], site=st.sites[0])
    fds, ref = fd_by_nfe(glp, real, [2, 4], ["uniform", "shift"])
    assert set(fds) == {"euler", "heun", "ab2", "euler_shift", "heun_shift", "ab2_shift"}
    assert all(math.isfinite(v) for d in fds.values() for v in d.values()) and abs(ref["euler"][4]) < 1e-9
