"""spml-deploy: SPML weakly supervised semantic segmentation, from training to deployment.

Core package: everything inference needs. It imports no stage package
(``spml_deploy.training``, ``spml_deploy.export``, ``spml_deploy.serving``).
"""

__version__ = "0.1.0"
