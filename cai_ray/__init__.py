"""cai-ray: Constitutional AI (Bai et al. 2022, arXiv 2212.08073) on Ray.

The core package stays light: importing it pulls in none of ray, vllm or deepspeed
(tests/unit/test_import_light.py proves it). Heavy imports live inside the code that needs them.
"""

from cai_ray.errors import CaiRayError

__version__ = "0.1.0"
__all__ = ["CaiRayError", "__version__"]
