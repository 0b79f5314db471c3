"""Getting a machine ready: the weights download and the doctor that checks the machine.

The UI takes only this package's public face (below); nothing here imports torch or LightX2V at
import time."""
