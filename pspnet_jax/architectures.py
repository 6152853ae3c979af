"""Named model architectures as `config.model` values; imports nothing, so config files load it
before JAX starts (a mistyped flag fails in a fraction of a second).

`MMSEG_ARCHITECTURE` is mmsegmentation's PSPNet (ResNetV1c: deep stem 32-32-64,
contract_dilation, basic blocks dilating only their first conv; align_corners=False
in the pyramid and the final resize; mmseg-pspnet.md): the values of the
config.model keys (and PSPNet arguments) that make it, set by the config
variant arch=mmseg and required by the mmseg weight format.
"""

MMSEG_ARCHITECTURE = {'deep_stem': True, 'stem_widths': (32, 32, 64), 'contract_dilation': True,
                      'dilate_basic_conv2': False, 'use_ppm': True, 'ppm_align_corners': False,
                      'align_corners': False}
