"""Prints the README's model table: parameters and MMACs of every registered model, from shapes alone.

    python bench/model_table.py > /tmp/table.md
"""
import jax
import jax.numpy as jnp

from gconv.complexity import count_macs, count_params
from gconv.models import create_model, list_models


def main() -> None:
    print("| model | input | params | MMACs |")
    print("|---|---|---:|---:|")
    for name in list_models():
        model = create_model(name)
        res = 32 if name.startswith(("resnext11", "resnext29")) else 224
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3))))["params"]
        print(f"| `{name}` | {res}x{res} | {count_params(params):,} | {count_macs(model, (res, res, 3)) / 1e6:,.1f} |")


if __name__ == "__main__":
    main()
