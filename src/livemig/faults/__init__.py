"""Fault injection: named fault points inside the services, armed by a plan."""
