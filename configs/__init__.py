"""The shipped training configs, installed as distrnn.configs (`distrnn train --config fast`)."""
