"""The version of grpoctl, in a module that imports nothing, so every stage can read it without importing the
package root (which sits above the stages); ``grpoctl.__version__`` re-exports it for pyproject and users."""

__version__ = "0.1.0"
