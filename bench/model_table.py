"""Prints the README's model table: parameters and MMACs of every registered model, from shapes alone.

    python bench/model_table.py > /tmp/table.md
"""
import jax
import jax.numpy as jnp

from gconv.complexity import count_macs, count_params
from gconv.models import create_model, family_of, list_models


def main() -> None:
    print("| model | input | params | MMACs |")
    print("|---|---|---:|---:|")
    for name in list_models():
        model = create_model(name)
        shape = family_of(model).input_shape(model)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape)))["params"]
        print(f"| `{name}` | {shape[0]}x{shape[1]} | {count_params(params):,} | {count_macs(model, shape) / 1e6:,.1f} |")


if __name__ == "__main__":
    main()
