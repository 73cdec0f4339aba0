"""icrm: a thin ICRM reward-model trainer built on icrm_kernels."""
