"""TFDS dataset builders for cen-jax (TFDS layout: data/<name>/<name>_dataset_builder.py).

Installed as the package `cen_jax.datasets` (pyproject.toml maps this folder there), so a
builder is always imported as `cen_jax.datasets.<name>.<name>_dataset_builder`: TFDS registers
each builder class once per process and refuses a second registration under another module
name. `cen_jax.input_pipeline.builder_module` does this for you. A builder imports at most
`cen_jax.preprocess` from the library.
"""
