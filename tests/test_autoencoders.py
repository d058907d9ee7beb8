"""DEC / IDEC's autoencoders against the layers applied by hand: the MLP's linear embedding and
reconstruction with ReLU elsewhere, DEC's layer-wise denoising loss written out, and the convolutional
autoencoder's map sizes from the convolution arithmetic, reconstructing every image size it accepts."""
from __future__ import annotations

import pytest
import torch

from models.autoencoder import build_autoencoder


def linear(layer: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    return h @ layer.weight.T + layer.bias


def build(name: str, **options):
    torch.manual_seed(0)
    ae = build_autoencoder(name, **options)
    with torch.no_grad():   # non-zero biases, so that a bias dropped or misplaced shows
        for p in ae.parameters():
            if p.dim() == 1:
                p.normal_()
    return ae


def test_the_mlp_is_linear_at_the_embedding_and_the_reconstruction_and_relu_between():
    ae = build("mlp_autoencoder", in_channels=3, image_size=4, hidden_dims=[20, 12], embedding_dim=5)
    x = torch.randn(6, 3, 4, 4)
    flat = x.reshape(6, 48)                              # channels first, as flatten(1)
    h1 = torch.relu(linear(ae.encoder[0], flat))
    h2 = torch.relu(linear(ae.encoder[1], h1))
    z = linear(ae.encoder[2], h2)
    assert (z < 0).any()                                 # no ReLU on the embedding
    torch.testing.assert_close(ae.encode(x), z)
    g2 = torch.relu(linear(ae.decoder[0], z))
    g1 = torch.relu(linear(ae.decoder[1], g2))
    r = linear(ae.decoder[2], g1)
    assert (r < 0).any()                                 # nor on the reconstruction
    torch.testing.assert_close(ae.decode(z), r.reshape(6, 3, 4, 4))
    assert [tuple(layer.weight.shape) for layer in ae.decoder] == [(12, 5), (20, 12), (48, 20)]   # mirrored
    assert ae.num_pairs == 3 and ae.embedding_dim == 5


@pytest.mark.parametrize("pair", [0, 1, 2])
def test_the_layerwise_loss_is_the_pairs_denoising_loss_written_out(pair):
    """Pair k: h = the clean output of encoder layers 0..k-1 (ReLU'd), y = layer k of drop(h) (ReLU
    unless it is the embedding), r = the mirror decoder layer of drop(y) (linear when it is the
    reconstruction); loss = mean (r - h)^2. Dropout is replayed from the same seed."""
    ae = build("mlp_autoencoder", in_channels=3, image_size=4, hidden_dims=[20, 12], embedding_dim=5)
    ae.train()
    x, last = torch.randn(6, 3, 4, 4), ae.num_pairs - 1
    h = x.reshape(6, 48)
    for i in range(pair):
        h = torch.relu(linear(ae.encoder[i], h))
    torch.manual_seed(7)
    got = ae.layerwise_loss(x, pair, dropout=0.3)
    torch.manual_seed(7)
    keep = torch.nn.functional.dropout(torch.ones_like(h), 0.3, True)   # the same draw: 1 / (1 - p) or 0
    y = linear(ae.encoder[pair], h * keep)
    y = y if pair == last else torch.relu(y)
    keep_y = torch.nn.functional.dropout(torch.ones_like(y), 0.3, True)
    r = linear(ae.decoder[last - pair], y * keep_y)
    r = r if pair == 0 else torch.relu(r)
    torch.testing.assert_close(got, (r - h).square().mean())
    got.backward()
    trained = {id(p) for p in ae.pair_parameters(pair)}
    assert trained == {id(p) for p in (*ae.encoder[pair].parameters(), *ae.decoder[last - pair].parameters())}
    assert all((p.grad is not None) == (id(p) in trained) for p in ae.parameters())


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@pytest.mark.parametrize("image_size, channels", [(28, 1), (32, 3), (96, 3), (64, 3), (9, 1), (27, 1), (13, 2)])
def test_the_conv_autoencoder_halves_three_times_and_reconstructs_its_input_size(image_size, channels):
    ae = build("conv_autoencoder", in_channels=channels, image_size=image_size, hidden_dims=[4, 6, 8],
               embedding_dim=7)
    s1 = conv_out(image_size, 5, 2, 2)
    s2 = conv_out(s1, 5, 2, 2)
    s3 = conv_out(s2, 3, 2, 0)
    x = torch.randn(2, channels, image_size, image_size)
    maps = []
    h = x
    for layer in ae.encoder:
        h = layer(h)
        if isinstance(layer, torch.nn.ReLU):
            maps.append(tuple(h.shape[1:]))
    assert maps == [(4, s1, s1), (6, s2, s2), (8, s3, s3)]
    z = ae.encode(x)
    assert z.shape == (2, 7)
    # ReLU after every layer but the embedding and the reconstruction
    kinds = [type(m).__name__ for m in (*ae.encoder, *ae.decoder_fc, *ae.decoder)]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear", "Linear", "ReLU",
                     "ConvTranspose2d", "ReLU", "ConvTranspose2d", "ReLU", "ConvTranspose2d"]
    decoded, sizes = ae.decoder_fc(z).view(2, 8, s3, s3), []
    for layer in ae.decoder:
        decoded = layer(decoded)
        if isinstance(layer, torch.nn.ConvTranspose2d):
            sizes.append(decoded.shape[-1])
    assert sizes == [s2, s1, image_size]                  # each transposed convolution undoes its convolution
    reconstruction = ae.decode(z)
    assert reconstruction.shape == x.shape
    torch.testing.assert_close(reconstruction, decoded)
    if image_size == 28:
        assert (s1, s2, s3) == (14, 7, 3)                 # the docstring's sizes


def test_the_conv_autoencoder_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match=r"^conv_autoencoder: image_size 8 is too small$"):
        build_autoencoder("conv_autoencoder", in_channels=1, image_size=8, hidden_dims=[4, 6, 8], embedding_dim=7)
    with pytest.raises(ValueError, match=r"^conv_autoencoder: expected three channel widths, got \[4, 6\]$"):
        build_autoencoder("conv_autoencoder", in_channels=1, image_size=28, hidden_dims=[4, 6], embedding_dim=7)
    ae = build_autoencoder("conv_autoencoder", in_channels=1, image_size=28, hidden_dims=[4, 6, 8], embedding_dim=7)
    assert ae.num_pairs == 0
    with pytest.raises(NotImplementedError, match="ConvAutoencoder has no layer-wise pretraining"):
        ae.layerwise_loss(torch.rand(1, 1, 28, 28), 0, dropout=0.2)
