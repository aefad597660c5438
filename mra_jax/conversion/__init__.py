"""HF checkpoint names and files <-> NNX parameters."""

from mra_jax.conversion.hf_export import to_hf_state_dict, write_hf_checkpoint
from mra_jax.conversion.hf_files import open_hf_weights
from mra_jax.conversion.hf_names import hf_name

__all__ = ["hf_name", "open_hf_weights", "to_hf_state_dict", "write_hf_checkpoint"]
