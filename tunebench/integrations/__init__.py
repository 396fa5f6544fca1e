"""Integrations of tunebench with the stacks people run models with. Each submodule imports its framework; this
package imports nothing."""
