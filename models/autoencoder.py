"""Autoencoder registry (DEC / IDEC): image (B, C, H, W) <-> embedding (B, embedding_dim).

Every builder takes `in_channels`, `image_size`, `hidden_dims` and `embedding_dim` and returns an
`Autoencoder`: `encode`, `decode`, and, when it supports DEC's greedy layer-wise pretraining,
`num_pairs` > 0 with `pair_parameters(k)` and `layerwise_loss(images, k, dropout=...)`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils.registry import Registry


class Autoencoder(nn.Module):
    embedding_dim: int
    num_pairs: int = 0  # 0: no layer-wise pretraining

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pair_parameters(self, k: int) -> list[nn.Parameter]:
        raise NotImplementedError(f"{type(self).__name__} has no layer-wise pretraining")

    def layerwise_loss(self, images: torch.Tensor, k: int, *, dropout: float) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no layer-wise pretraining")


AUTOENCODERS: Registry[Callable[..., Autoencoder]] = Registry("autoencoder")


class MLPAutoencoder(Autoencoder):
    """DEC's fully connected autoencoder d-500-500-2000-10 (dims configurable), ReLU after every layer
    except the embedding (encoder's last) and the reconstruction (decoder's last), which are linear.

    Pair k (0-based) is encoder layer k with its mirror decoder layer L-1-k: the unit DEC pretrains
    greedily as a denoising autoencoder of the previous pair's (post-ReLU, clean) output.
    """

    def __init__(self, *, in_channels: int, image_size: int, hidden_dims: list[int], embedding_dim: int):
        super().__init__()
        self.image_shape = (in_channels, image_size, image_size)
        dims = [in_channels * image_size * image_size, *hidden_dims, embedding_dim]
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.decoder = nn.ModuleList(nn.Linear(b, a) for a, b in reversed(list(zip(dims[:-1], dims[1:]))))
        self.embedding_dim = embedding_dim
        self.num_pairs = len(self.encoder)
        for layer in [*self.encoder, *self.decoder]:  # DEC/IDEC's Glorot-uniform weights, zero bias
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _encoder_layer(self, h: torch.Tensor, k: int) -> torch.Tensor:
        h = self.encoder[k](h)
        return h if k == self.num_pairs - 1 else F.relu(h)

    def _decoder_layer(self, h: torch.Tensor, j: int) -> torch.Tensor:
        h = self.decoder[j](h)
        return h if j == self.num_pairs - 1 else F.relu(h)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        h = images.flatten(1)
        for k in range(self.num_pairs):
            h = self._encoder_layer(h, k)
        return h

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        h = embeddings
        for j in range(self.num_pairs):
            h = self._decoder_layer(h, j)
        return h.view(-1, *self.image_shape)

    def pair_parameters(self, k: int) -> list[nn.Parameter]:
        return [*self.encoder[k].parameters(), *self.decoder[self.num_pairs - 1 - k].parameters()]

    def layerwise_loss(self, images: torch.Tensor, k: int, *, dropout: float) -> torch.Tensor:
        """Denoising loss of pair k: the clean input of layer k (frozen layers 0..k-1, after ReLU) is
        dropped out, encoded by layer k, dropped out again, decoded by its mirror, and compared
        (MSE) with the clean input: h~ = drop(h), y = g(W h~), r = g'(W' drop(y))."""
        with torch.no_grad():
            h = images.flatten(1)
            for i in range(k):
                h = self._encoder_layer(h, i)
        y = self._encoder_layer(F.dropout(h, dropout, self.training), k)
        r = self._decoder_layer(F.dropout(y, dropout, self.training), self.num_pairs - 1 - k)
        return (r - h).square().mean()


@AUTOENCODERS.register("mlp_autoencoder")
def mlp_autoencoder(*, in_channels: int, image_size: int, hidden_dims: list[int],
                    embedding_dim: int) -> Autoencoder:
    return MLPAutoencoder(in_channels=in_channels, image_size=image_size, hidden_dims=hidden_dims,
                          embedding_dim=embedding_dim)


class ConvAutoencoder(Autoencoder):
    """A convolutional variant for images (DCEC-style, Guo et al. 2017): three stride-2 convolutions
    (5x5, 5x5, 3x3 unpadded; widths `hidden_dims`), a linear embedding, and the mirror transposed
    convolutions; ReLU everywhere except the embedding and the reconstruction. 28 px: 14, 7, 3."""

    def __init__(self, *, in_channels: int, image_size: int, hidden_dims: list[int], embedding_dim: int):
        super().__init__()
        if len(hidden_dims) != 3:
            raise ValueError(f"conv_autoencoder: expected three channel widths, got {hidden_dims}")
        c1, c2, c3 = hidden_dims
        s1 = (image_size + 1) // 2
        s2 = (s1 + 1) // 2
        s3 = (s2 - 3) // 2 + 1
        if s3 < 1:
            raise ValueError(f"conv_autoencoder: image_size {image_size} is too small")
        self.shape3 = (c3, s3, s3)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(c1, c2, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(c3 * s3 * s3, embedding_dim))
        self.decoder_fc = nn.Sequential(nn.Linear(embedding_dim, c3 * s3 * s3), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c3, c2, 3, stride=2, output_padding=s2 - ((s3 - 1) * 2 + 3)), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 5, stride=2, padding=2, output_padding=s1 - ((s2 - 1) * 2 + 1)), nn.ReLU(),
            nn.ConvTranspose2d(c1, in_channels, 5, stride=2, padding=2,
                               output_padding=image_size - ((s1 - 1) * 2 + 1)))
        self.embedding_dim = embedding_dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decoder_fc(embeddings).view(-1, *self.shape3))


@AUTOENCODERS.register("conv_autoencoder")
def conv_autoencoder(*, in_channels: int, image_size: int, hidden_dims: list[int],
                     embedding_dim: int) -> Autoencoder:
    return ConvAutoencoder(in_channels=in_channels, image_size=image_size, hidden_dims=hidden_dims,
                           embedding_dim=embedding_dim)


def build_autoencoder(name: str, *, in_channels: int, image_size: int, hidden_dims: list[int],
                      embedding_dim: int) -> Autoencoder:
    return AUTOENCODERS.get(name)(in_channels=in_channels, image_size=image_size, hidden_dims=list(hidden_dims),
                                  embedding_dim=embedding_dim)
