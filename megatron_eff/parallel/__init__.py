"""megatron_eff.parallel"""
