"""Fleet learning: agents train one model together with Flower, and no raw data leaves a machine.

Modules, in the order data flows through them:

``params``     the defect classifier (``pdm_tools.models.defect_mlp.DefectMlp``) as Flower arrays, and the
               numpy training step a client runs on its own rows (Adam, optional FedProx term)
``data``       a client's local rows (a data folder)
``fleets``     the fleets the evaluation builds from a dataset (which client holds which rows)
``client_app`` the Flower ClientApp: answers ``query`` (feature sums), ``train`` and ``evaluate``
``server_app`` the Flower ServerApp: standardization from the clients' sums, then the chosen strategy
``evaluate``   ``pdm-agent fleet evaluate``: federated vs central vs local-only on a dataset split like a fleet
``cli``        the ``pdm-agent fleet`` commands
"""
