"""x86-64: CPUID, MSRs, boot registers and the MP table."""
