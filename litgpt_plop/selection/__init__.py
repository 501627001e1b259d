"""What a placement is and how one is chosen: the method registry (``methods``), the placement type and its
scores (``placement``), the selection rules on score tables (``rules``) and how stable a choice is (``stability``)."""
