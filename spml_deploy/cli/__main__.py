"""``python -m spml_deploy.cli ...`` (what ``torchrun -m`` runs): the ``spml-deploy`` command."""
from spml_deploy.cli import main

main()
