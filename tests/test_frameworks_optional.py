"""Frameworks stay optional: importing, saving and restoring import no framework the state does not use."""

from __future__ import annotations

import json

from tests.fw_helpers import run_python

FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "optax", "flax")

PROBE = f"""
import json, sys, tempfile, os
def loaded():
    return sorted({{m.partition(".")[0] for m in sys.modules}} & set({FRAMEWORKS!r}))
"""


def test_import_and_numpy_only_use_import_no_framework() -> None:
    out = run_python(
        PROBE
        + """
import ckptstore
after_import = loaded()
import numpy as np, random
path = os.path.join(tempfile.mkdtemp(), "c")
gen = np.random.default_rng(0)
ckptstore.save(path, {"w": np.ones(3), "gen": gen, "rng": ckptstore.RNGState(), "n": [1, (2, "x")]})
ckptstore.restore(path, like={"w": np.zeros(3), "gen": np.random.default_rng(), "rng": ckptstore.RNGState(), "n": 0})
ckptstore.restore(path)
try:
    ckptstore.save(path + "x", {"o": object()})
except ckptstore.errors.UnsupportedTypeError:
    pass
state = ckptstore.RNGState().state_dict()
print(json.dumps({"import": after_import, "use": loaded(), "rng_keys": sorted(state)}))
"""
    )
    result = json.loads(out)
    assert result == {"import": [], "use": [], "rng_keys": ["numpy", "python"]}


def test_a_jax_state_imports_neither_torch_nor_tensorflow() -> None:
    out = run_python(
        PROBE
        + """
import ckptstore, jax.numpy as jnp, optax
path = os.path.join(tempfile.mkdtemp(), "c")
params = {"w": jnp.ones(3)}
ckptstore.save(path, {"p": params, "o": optax.adam(1e-3).init(params), "k": __import__("jax").random.key(0)})
ckptstore.restore(path, like={"p": params, "o": optax.adam(1e-3).init(params), "k": __import__("jax").random.key(1)})
print(json.dumps(loaded()))
"""
    )
    assert json.loads(out) == ["jax", "jaxlib", "optax"]
