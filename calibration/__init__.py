"""Range observers and calibration for activation quantizers (imported as ``g2quant.calibration``)."""
