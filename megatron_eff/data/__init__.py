"""megatron_eff.data"""
