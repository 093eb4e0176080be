"""megatron_eff.training"""
