"""The Ray Serve application: policy (OpenAI-compatible), preference model and constitution.

Start it with `cai_ray.serve.launch.serve_app(cfg)` or `cai-ray serve CONFIG`. Importing this
package is light; `cai_ray.serve.app` imports ray, serve and fastapi.
"""
