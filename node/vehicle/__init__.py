"""Vehicle state (``state``), where it comes from (``simulated``, ``sources``, ``spec``) and the
battery/thermal physics shared with the fleet simulator (``physics``). Imports nothing of node/."""
