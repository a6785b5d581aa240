"""TFDS dataset builders for cen-jax (TFDS layout: data/<name>/<name>_dataset_builder.py).

Import builders as `data.<name>.<name>_dataset_builder` (always under that module name: TFDS
registers each builder class once per process and refuses a second registration under another
module name). `cen_jax.input_pipeline.prepare` does this for you.
"""
