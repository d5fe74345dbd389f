"""Family-agnostic parallel machinery: row arithmetic, collectives and autograd Functions, halo layers,
distributed normalization, sharded attention, and the module-plan mechanics every family adapter uses."""
