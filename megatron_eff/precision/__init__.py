"""megatron_eff.precision"""
