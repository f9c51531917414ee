"""The built-in layer kinds, one module each (`nemojax.families` loads them on first lookup):

    M  mamba      Mamba-2 mixer (SSD), nemojax.kinds.mamba
    *  attention  grouped-query attention, nemojax.kinds.attention
    -  mlp        squared-ReLU MLP, nemojax.kinds.mlp
    E  moe        sigmoid-routed mixture of experts, nemojax.kinds.moe
"""
