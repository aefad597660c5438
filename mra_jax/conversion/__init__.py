"""HF checkpoint names and files <-> NNX parameters."""

from mra_jax.conversion.hf_names import hf_name
from mra_jax.conversion.safetensors_io import read_safetensors_dir
from mra_jax.conversion.state_dict import load_hf_state_dict, to_hf_state_dict

__all__ = ["hf_name", "load_hf_state_dict", "read_safetensors_dir", "to_hf_state_dict"]
