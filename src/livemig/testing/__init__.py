"""Fakes for fast tests of logic. Never the proof that a capability works: e2e tests are."""
