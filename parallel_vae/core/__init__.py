"""Family-agnostic parallel machinery: row arithmetic, collectives and autograd Functions, the generic halo conv,
distributed normalization, sharded attention, and the module-plan mechanics every family adapter uses. Nothing here
imports a family; layers written for one diffusers class live in :mod:`parallel_vae.layers`."""
