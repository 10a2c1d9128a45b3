"""Governance: Cedar rules per agent and per argument (``rules.py`` over the vocabulary
of ``model.py``), and human approval of the actions a rule parks: the durable store
(``approvals.py``), the pipeline's gate (``gate.py``), the webhook (``notify.py``), the
approvers' tokens (``approvers.py``) and HTTP endpoint (``http.py``). docs/policy.md.
"""
