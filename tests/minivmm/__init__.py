"""minivmm: a minimal KVM VMM of the project's own (minivmm.c) and its typed driver."""
