from django.contrib.gis.db import models


class City(models.Model):
    name = models.CharField(max_length=100, unique=True)
    # A geography column: distances are in metres on the spheroid, whatever the srid.
    point = models.PointField(srid=4326, geography=True)

    def __str__(self) -> str:
        return self.name
