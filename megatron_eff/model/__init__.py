"""megatron_eff.model"""
