"""Operating a fleet: the operator's commands (``cli``, ``dead``, ``keys``, ``roles``), the
local fleet of ``actionfleet up`` (``fleet``; its Redis users and operator key:
``fleet_auth``), the demo, Prometheus metrics and Flower.
May import anything below it (``producer``, ``sandboxes``, ``audit``, ``workers.config``,
``workers.guarantees``, ``workers.executors``, ``workers.auth``, ``workers.gateway``); the
pipeline imports only ``metrics``."""
